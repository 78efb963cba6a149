/* The review page's script (archalign/html.py inlines it): draws the plan data of #plan-data.
 * The rows, lines and review rows are laid out in Python; every text, shape and band comes
 * from there (archalign/review.py), so this script formats no shape and decides no band. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("plan-data").textContent);
  var S = data.summary;
  var status = document.getElementById("status");
  var board = document.getElementById("board");
  var svg = document.getElementById("wires");
  var NS = svg.namespaceURI;
  var tip = document.getElementById("tip");
  var pinned = null;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function sv(tag, attrs) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) { e.setAttribute(k, attrs[k]); }
    return e;
  }
  function num(x) { return typeof x === "number" ? x : Number(x); }
  function fmt(x, d) { return typeof x === "number" ? x.toFixed(d) : String(x); }
  var BAND_COLOURS = { low: "var(--red)", mid: "var(--amber)", high: "var(--green)" };
  function colour(band) { return BAND_COLOURS[band] || "var(--line)"; }
  function missLabel(it) {
    var a = it.src_shapes.join(", "), b = it.dst_shapes.join(", ");
    return /^shape mismatch/.test(it.reason) && a !== b ? "shape " + a + " \u2260 " + b : it.reason;
  }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : (/(s|ch)$/.test(word) ? "es" : "s")); }

  /* ------------------------------------------------------------ summary */
  document.getElementById("title").textContent = data.title;
  var small = el("small", null, "archalign review report");
  document.getElementById("title").appendChild(small);
  var compared = document.getElementById("compared");
  [["source", S.source], ["destination", S.destination]].forEach(function (side, i) {
    if (!side[1]) { return; }
    if (i && compared.firstChild) { compared.appendChild(el("span", "arrow", "\u2192")); }
    compared.appendChild(el("b", null, side[0]));
    compared.appendChild(el("span", "name", side[1]));
  });
  var cards = document.getElementById("cards");
  function card(n, label, warn) {
    var c = el("div", "card" + (warn && n > 0 ? " warn" : ""));
    c.appendChild(el("b", null, n));
    c.appendChild(el("span", null, label));
    cards.appendChild(c);
  }
  var lowCount = 0, flaggedCount = 0;
  data.links.forEach(function (l) {
    if (l.kind === "match") {
      l.items.forEach(function (it) {
        if (it.band === "low") { lowCount++; }
        if (it.flags.length) { flaggedCount++; }
      });
    }
  });
  card(S.matches, "matches");
  card(S.adapted, "adapted");
  card(lowCount, "below " + data.low.toFixed(2), true);
  card(flaggedCount, "flagged", true);
  card(S.mismatches, "mismatches", true);
  card(S.unmatched_dst, "unmatched destination", true);
  card(S.unmatched_src, "unmatched source", false);
  card(data.dst.length + " / " + data.src.length, "layers dst / src");
  var meta = document.getElementById("meta");
  function metaItem(label, value, cls) {
    var d = el("span", null, label + " ");
    var c = el("code", cls, value === "" ? "\u2014" : value);
    d.appendChild(c);
    meta.appendChild(d);
  }
  metaItem("source tracer", S.src_tracer);
  metaItem("destination tracer", S.dst_tracer);
  if (S.verification) {
    var v = String(S.verification);
    metaItem("verification", v, /^outputs agree/i.test(v) ? "ok" : (/differ/i.test(v) ? "bad" : null));
  } else {
    metaItem("verification", "not run");
  }
  if (S.nonfinite && S.nonfinite.length) {
    metaItem("NaN/Inf in the source", S.nonfinite.join(", "), "bad");
  }
  if (data.flags.length) {
    var notes = el("div", "flagnotes");
    data.flags.forEach(function (f) {
      var line = el("div");
      line.appendChild(el("b", null, f.flag));
      line.appendChild(document.createTextNode(" (" + plural(f.rows, "row") + "): " + f.note));
      notes.appendChild(line);
    });
    meta.parentNode.insertBefore(notes, meta.nextSibling);
  }
  var tiedBox = document.getElementById("tied");
  if (S.tied_src.length || S.tied_dst.length) {
    var det = el("details", "tied");
    det.appendChild(el("summary", null, "tied tensors: " + S.tied_src.length + " source, " +
                       S.tied_dst.length + " destination (the alias loads through its primary)"));
    var ul = el("ul");
    [["source", S.tied_src], ["destination", S.tied_dst]].forEach(function (side) {
      side[1].forEach(function (t) { ul.appendChild(el("li", null, side[0] + " " + t[0] + " = " + t[1])); });
    });
    det.appendChild(ul);
    tiedBox.appendChild(det);
  }
  var legend = document.getElementById("legend");
  [["var(--green)", "\u2265 " + data.high.toFixed(2), ""],
   ["var(--amber)", "\u2265 " + data.low.toFixed(2), ""],
   ["var(--red)", "< " + data.low.toFixed(2), ""],
   ["var(--miss)", "not loaded", "dash"],
   [null, "unmatched", "box"],
   [null, "flagged", "flag"]].forEach(function (x) {
    var s = el("span");
    var i = el("i", x[2]);
    if (x[0]) { i.style.borderTopColor = x[0]; }
    s.appendChild(i);
    s.appendChild(document.createTextNode(x[1]));
    legend.appendChild(s);
  });

  /* ------------------------------------------------------------ rows */
  var rowEls = { src: [], dst: [] };
  var rowLinks = { src: [], dst: [] };
  function buildColumn(side) {
    var col = document.getElementById(side);
    data[side].forEach(function (row, i) {
      var r = el("div", "row " + row.state);
      r.setAttribute("data-side", side);
      r.setAttribute("data-index", String(i));
      var head = el("div", "unit", row.title);
      head.title = row.unit;
      if (row.state === "unmatched" && row.tensors.every(function (t) { return t.state === "mismatch"; })) {
        head.appendChild(el("span", "tag miss", "not loaded"));
      } else if (row.state !== "matched") {
        head.appendChild(el("span", "tag lonely", (row.state === "partial" ? "partly " : "") +
          (side === "dst" ? "unmatched" : "unused")));
      }
      r.appendChild(head);
      var ts = el("div", "tensors");
      var flags = [];
      row.tensors.forEach(function (t) {
        var tf = t.flags || [];
        var s = el("span", "tensor " + t.state + (tf.length ? " flagged" : ""));
        s.title = t.key + ({ matched: "", mismatch: "  (not loaded)", unmatched: "  (unmatched)" })[t.state] +
          (tf.length ? "  (" + tf.join(", ") + ")" : "");
        s.appendChild(document.createTextNode(t.label));
        if (t.shape) { s.appendChild(el("span", "shape", " " + t.shape)); }
        if (t.conf) { s.appendChild(el("span", "conf " + t.band, t.conf)); }
        tf.forEach(function (f) { if (flags.indexOf(f) < 0) { flags.push(f); } });
        ts.appendChild(s);
      });
      if (flags.length) {
        r.classList.add("suspect");
        flags.forEach(function (f) { head.appendChild(el("span", "tag flag", f)); });
      }
      r.appendChild(ts);
      r.addEventListener("mouseenter", function () { focusRow(side, i, true); });
      r.addEventListener("mouseleave", function () { focusRow(side, i, false); });
      col.appendChild(r);
      rowEls[side].push(r);
      rowLinks[side].push([]);
    });
  }
  buildColumn("src");
  buildColumn("dst");

  /* ------------------------------------------------------------ lines */
  var wires = [];
  var nMatch = 0, nMiss = 0;
  data.links.forEach(function (l, i) {
    var g = sv("g", { "class": "wire", "data-index": String(i) });
    var path = sv("path", { "class": "link " + l.kind, "data-kind": l.kind });
    if (l.kind === "match") {
      path.style.stroke = colour(l.band);
      nMatch++;
    } else {
      nMiss++;
    }
    var grab = sv("path", { "class": "grab" });
    g.appendChild(path);
    g.appendChild(grab);
    var label = null;
    var text = l.kind === "match" ? l.ops.join(" | ") : "\u2715 " + missLabel(l.items[0]);
    if (text) {
      if (text.length > 34) { text = text.slice(0, 33) + "\u2026"; }
      label = sv("g", { "class": "label " + l.kind });
      var rect = sv("rect", { rx: "4", ry: "4" });
      rect.style.stroke = l.kind === "match" ? colour(l.band) : "var(--miss)";
      var t = sv("text", { "text-anchor": "middle", "dominant-baseline": "central" });
      t.textContent = text;
      label.appendChild(rect);
      label.appendChild(t);
      g.appendChild(label);
    }
    if (l.kind === "match") {
      var srcRow = rowEls.src[l.src], dstRow = rowEls.dst[l.dst];
      var c = colour(l.band);
      [srcRow, dstRow].forEach(function (r) {
        var prev = r.getAttribute("data-conf");
        if (prev === null || num(l.confidence) < num(prev)) {
          r.setAttribute("data-conf", String(l.confidence));
          r.style.setProperty("--c", c);
        }
      });
      if (l.ops.length) {
        dstRow.querySelector(".unit").appendChild(el("span", "tag op", l.ops.join(" | ")));
      }
    } else {
      [rowEls.src[l.src], rowEls.dst[l.dst]].forEach(function (r) {
        r.classList.add("has-miss");
        if (!r.style.getPropertyValue("--c")) { r.style.setProperty("--c", "var(--miss)"); }
      });
    }
    grab.addEventListener("mouseenter", function (e) {
      if (pinned === null) { showTip(i, e.clientX, e.clientY); }
      hot(i, true);
    });
    grab.addEventListener("mousemove", function (e) {
      if (pinned === null) { placeTip(e.clientX, e.clientY); }
    });
    grab.addEventListener("mouseleave", function () {
      if (pinned === null) { hideTip(); }
      if (pinned !== i) { hot(i, false); }
    });
    grab.addEventListener("click", function (e) { e.stopPropagation(); pin(i, e.clientX, e.clientY); });
    svg.appendChild(g);
    rowLinks.src[l.src].push(i);
    rowLinks.dst[l.dst].push(i);
    wires.push({ g: g, path: path, grab: grab, label: label, link: l });
  });

  function layout() {
    var b = board.getBoundingClientRect();
    wires.forEach(function (w) {
      var a = rowEls.src[w.link.src].getBoundingClientRect();
      var z = rowEls.dst[w.link.dst].getBoundingClientRect();
      var x1 = a.right - b.left, y1 = a.top + a.height / 2 - b.top;
      var x2 = z.left - b.left, y2 = z.top + z.height / 2 - b.top;
      var dx = Math.max(40, (x2 - x1) / 2);
      var d = "M" + x1 + "," + y1 + " C" + (x1 + dx) + "," + y1 + " " +
        (x2 - dx) + "," + y2 + " " + x2 + "," + y2;
      w.path.setAttribute("d", d);
      w.grab.setAttribute("d", d);
      if (w.label) {
        var mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
        var t = w.label.lastChild, r = w.label.firstChild;
        t.setAttribute("x", String(mx));
        t.setAttribute("y", String(my));
        var len = t.getComputedTextLength ? t.getComputedTextLength() : t.textContent.length * 6.5;
        r.setAttribute("x", String(mx - len / 2 - 5));
        r.setAttribute("y", String(my - 8));
        r.setAttribute("width", String(len + 10));
        r.setAttribute("height", "16");
      }
    });
  }

  /* ------------------------------------------------------------ tooltip */
  function costLine(costs) {
    var line = el("div", "costs");
    line.appendChild(el("span", "lbl", "costs"));
    costs.forEach(function (kv) {
      var term = el("span", "term", kv[0] + " ");
      term.appendChild(el("b", null, fmt(kv[1], 3)));
      line.appendChild(term);
    });
    if (!costs.length) { line.appendChild(document.createTextNode("\u2014")); }
    return line;
  }
  function showTip(i, x, y) {
    var l = data.links[i];
    tip.textContent = "";
    tip.appendChild(el("h3", null, data.dst[l.dst].title + "  \u2190  " + data.src[l.src].title));
    if (l.kind === "match") {
      var p = el("div", null, "confidence ");
      var c = el("span", "conf", l.conf);
      c.style.color = colour(l.band);
      p.appendChild(c);
      p.appendChild(document.createTextNode("  \u00b7  " + plural(l.items.length, "tensor") +
        (l.ops.length ? "  \u00b7  adapted: " + l.ops.join(" | ") : "")));
      tip.appendChild(p);
    } else {
      tip.appendChild(el("div", null, "not loaded (near miss) \u00b7 " + plural(l.items.length, "tensor")));
    }
    var sigs = l.items.map(function (it) { return JSON.stringify(it.costs || []); });
    var shared = sigs.every(function (x) { return x === sigs[0]; });
    var list = el("div", "items");
    l.items.forEach(function (it) {
      var item = el("div", "item");
      it.dst.forEach(function (k, j) {
        var line = el("div", "k");
        line.appendChild(el("b", null, k));
        line.appendChild(el("span", "shape", " " + it.dst_shapes[j]));
        item.appendChild(line);
      });
      it.src.forEach(function (k, j) {
        var line = el("div", "k src" + (j ? " more" : ""), (j ? "" : "\u2190 ") + k);
        line.appendChild(el("span", "shape", " " + it.src_shapes[j]));
        item.appendChild(line);
      });
      if (l.kind === "match") {
        var info = el("div", "info", "confidence ");
        var c = el("span", "conf", it.conf);
        c.style.color = colour(it.band);
        info.appendChild(c);
        if (it.adaptation) { info.appendChild(el("span", "tag op", it.adaptation)); }
        if (it.nonfinite) { info.appendChild(el("span", "tag nonfinite", "NaN/Inf in the source")); }
        it.flags.forEach(function (f) { info.appendChild(el("span", "tag flag", f)); });
        item.appendChild(info);
        if (!shared) { item.appendChild(costLine(it.costs)); }
      } else {
        item.appendChild(el("div", "reason", it.reason));
      }
      list.appendChild(item);
    });
    tip.appendChild(list);
    if (l.kind === "match" && shared) { tip.appendChild(costLine(l.items[0].costs)); }
    tip.appendChild(el("div", "hint", pinned === null ? "click the line to pin it" :
      "pinned \u00b7 click elsewhere or press Esc to close"));
    tip.style.display = "block";
    placeTip(x, y);
  }
  function placeTip(x, y) {
    var w = tip.offsetWidth, h = tip.offsetHeight;
    var left = Math.min(x + 16, window.innerWidth - w - 8);
    var top = y + 16 + h > window.innerHeight ? y - h - 12 : y + 16;
    tip.style.left = Math.max(8, left) + "px";
    tip.style.top = Math.max(8, top) + "px";
  }
  function hideTip() { tip.style.display = "none"; tip.classList.remove("pinned"); }
  function hot(i, on) {
    var w = wires[i];
    w.path.classList.toggle("hot", on);
    if (w.label) { w.label.classList.toggle("hot", on); }
    board.classList.toggle("focusing", on || pinned !== null);
    rowEls.src[w.link.src].classList.toggle("focus", on);
    rowEls.dst[w.link.dst].classList.toggle("focus", on);
  }
  function pin(i, x, y) {
    if (pinned !== null) { hot(pinned, false); }
    pinned = i;
    hot(i, true);
    showTip(i, x, y);
    tip.classList.add("pinned");
    writeHash();
  }
  function unpin() {
    if (pinned === null) { return; }
    var i = pinned;
    pinned = null;
    hot(i, false);
    hideTip();
    writeHash();
  }
  document.addEventListener("click", function (e) { if (!tip.contains(e.target)) { unpin(); } });
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") { unpin(); } });
  function focusRow(side, i, on) {
    rowLinks[side][i].forEach(function (j) {
      wires[j].path.classList.toggle("hot", on || j === pinned);
      if (wires[j].label) { wires[j].label.classList.toggle("hot", on || j === pinned); }
    });
    board.classList.toggle("focusing", (on && rowLinks[side][i].length > 0) || pinned !== null);
  }

  /* ------------------------------------------------------------ filter */
  /* The slider is apply's min_confidence (it starts at the default): lines at or above it load
   * and are drawn in full, the others fade ("only below" shows just those). The count is the
   * destination tensors apply(min_confidence=...) writes from the plan's matches. */
  var minInput = document.getElementById("min");
  var belowInput = document.getElementById("below");
  var flaggedInput = document.getElementById("flagged");
  minInput.value = String(data["default"]);
  function applyFilter() {
    var t = Number(minInput.value), below = belowInput.checked, onlyFlagged = flaggedInput.checked;
    document.getElementById("minv").textContent = t.toFixed(2);
    var visible = 0, loads = 0, total = 0;
    var live = { src: {}, dst: {} };
    wires.forEach(function (w) {
      var l = w.link;
      var show = true, loaded = true;
      if (l.kind === "match") {
        l.items.forEach(function (it) {
          var c = num(it.confidence);
          total += it.dst.length;
          if (!(c < t)) { loads += it.dst.length; }  /* as apply: only c < t is skipped */
        });
        var c = num(l.confidence);
        loaded = c >= t || !(c === c);
        show = below ? !loaded : true;
        if (onlyFlagged && !l.flags.length) { show = false; }
      } else if (onlyFlagged) {
        show = false;
      }
      var faded = show && !loaded && !below;  /* "only below" draws the lines it asked for in full */
      w.g.classList.toggle("hidden", !show);
      w.g.classList.toggle("faded", faded);
      if (show && !faded) { visible++; }  /* data-visible: the lines drawn in full */
      if (show) { live.src[l.src] = true; live.dst[l.dst] = true; }
    });
    ["src", "dst"].forEach(function (side) {
      rowEls[side].forEach(function (r, i) {
        r.classList.toggle("dim", rowLinks[side][i].length > 0 && !live[side][i]);
      });
    });
    document.getElementById("shown").textContent = "apply(min_confidence=" + t.toFixed(2) + ") loads " +
      loads + " of " + plural(total, "matched tensor") +
      (t === data["default"] ? " (the default)" : "");
    status.setAttribute("data-visible", String(visible));
    status.setAttribute("data-loads", String(loads));
    writeHash();
  }
  minInput.addEventListener("input", applyFilter);
  belowInput.addEventListener("change", applyFilter);
  flaggedInput.addEventListener("change", applyFilter);

  /* ------------------------------------------------------------ search */
  var q = document.getElementById("q");
  var hits = [], current = -1;
  function search(jump) {
    var needle = q.value.trim().toLowerCase();
    hits.forEach(function (r) { r.classList.remove("hit", "current"); });
    hits = [];
    current = -1;
    if (needle) {
      ["src", "dst"].forEach(function (side) {
        data[side].forEach(function (row, i) {
          var found = row.unit.toLowerCase().indexOf(needle) >= 0 ||
            row.tensors.some(function (t) { return t.key.toLowerCase().indexOf(needle) >= 0; });
          if (found) { hits.push(rowEls[side][i]); }
        });
      });
      hits.sort(function (a, b) { return a.getBoundingClientRect().top - b.getBoundingClientRect().top; });
      hits.forEach(function (r) { r.classList.add("hit"); });
    }
    document.getElementById("hits").textContent = needle ? plural(hits.length, "hit") : "";
    status.setAttribute("data-hits", String(hits.length));
    if (jump && hits.length) { next(); }
    writeHash();
  }
  function next() {
    if (!hits.length) { return; }
    if (current >= 0) { hits[current].classList.remove("current"); }
    current = (current + 1) % hits.length;
    hits[current].classList.add("current");
    hits[current].scrollIntoView({ block: "center" });
    document.getElementById("hits").textContent = (current + 1) + " / " + plural(hits.length, "hit");
  }
  q.addEventListener("input", function () { search(true); });
  q.addEventListener("keydown", function (e) { if (e.key === "Enter") { e.preventDefault(); next(); } });

  /* ------------------------------------------------------------ state in the URL */
  /* #q=<search>&min=<threshold>&below=1&flagged=1&pin=<line>: read on load, kept up to date
   * (min only when it is not the default) */
  var ready = false;
  function writeHash() {
    if (!ready || !window.history || !history.replaceState) { return; }
    var parts = [];
    if (q.value) { parts.push("q=" + encodeURIComponent(q.value)); }
    if (Number(minInput.value) !== data["default"]) { parts.push("min=" + minInput.value); }
    if (belowInput.checked) { parts.push("below=1"); }
    if (flaggedInput.checked) { parts.push("flagged=1"); }
    if (pinned !== null) { parts.push("pin=" + pinned); }
    var url = parts.length ? "#" + parts.join("&") : location.pathname + location.search;
    try { history.replaceState(null, "", url); } catch (err) { /* a convenience only */ }
  }
  function readHash() {
    var state = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var k = kv.split("=")[0];
      if (k) { try { state[k] = decodeURIComponent(kv.slice(k.length + 1)); } catch (err) { state[k] = ""; } }
    });
    if (state.min !== undefined && !isNaN(Number(state.min))) { minInput.value = state.min; }
    if (state.below === "1") { belowInput.checked = true; }
    if (state.flagged === "1") { flaggedInput.checked = true; }
    if (state.q) { q.value = state.q; }
    return state;
  }

  var initial = readHash();
  if (!data.links.length && !data.src.length && !data.dst.length) {
    board.appendChild(el("p", "empty", "The plan is empty."));
  }
  layout();
  applyFilter();
  search(Boolean(initial.q));
  var pinIndex = initial.pin === undefined ? NaN : parseInt(initial.pin, 10);
  if (pinIndex >= 0 && pinIndex < wires.length) {
    var box = wires[pinIndex].path.getBoundingClientRect();
    pin(pinIndex, box.left + box.width / 2, box.top + box.height / 2);
  }
  var scheduled = false;
  function relayout() {
    if (scheduled) { return; }
    scheduled = true;
    window.requestAnimationFrame(function () { scheduled = false; layout(); });
  }
  window.addEventListener("resize", relayout);
  if (window.ResizeObserver) { new ResizeObserver(relayout).observe(board); }
  if (document.fonts && document.fonts.ready) { document.fonts.ready.then(relayout); }
  ready = true;
  status.setAttribute("data-lines", String(nMatch));
  status.setAttribute("data-mismatch-lines", String(nMiss));
  status.setAttribute("data-src-rows", String(data.src.length));
  status.setAttribute("data-flagged", String(flaggedCount));
  status.setAttribute("data-dst-rows", String(data.dst.length));
  status.setAttribute("data-errors", String(window.archalignErrors.length));
  status.setAttribute("data-state", "ready");
})();
