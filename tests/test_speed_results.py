"""benchmarks/speed.py: a partial run (``--only``) replaces only its own sections of speed.md."""

from __future__ import annotations

from benchmarks._harness import Target
from benchmarks.speed import merged, section_number

OLD = """# Speed and memory: archalign

Old header.

## 1. Align time

_Measured at git aaa._

| a | b |

### Scaling sweep

more

## 4. Conversion throughput

_Measured at git aaa._

old convert

## Targets (from the issue)

| section | target | measured | verdict |
|---|---|---|---|
| 1 | align < 0.5 s | 0.4 s | PASS |
| 4 | convert >= 0.8x | 0.57x | FAIL |
"""


def test_a_partial_run_keeps_the_other_sections_and_their_targets():
    text = merged(OLD, ["# Speed and memory: archalign", "", "New header.", ""],
                  {"4": ["## 4. Conversion throughput", "", "_Measured at git bbb._", "new"]},
                  [("4", Target("convert >= 0.8x", "0.9x", True))])
    assert "New header." in text and "Old header." not in text
    assert "### Scaling sweep" in text and "| a | b |" in text  # section 1 kept whole
    assert "old convert" not in text and "new" in text
    assert text.index("## 1. Align") < text.index("## 4. Conv") < text.index("## Targets")
    assert "| 1 | align < 0.5 s | 0.4 s | PASS |" in text
    assert "| 4 | convert >= 0.8x | 0.9x | PASS |" in text and "0.57x" not in text
    assert merged(text, ["# Speed and memory: archalign", "", "New header.", ""], {}, []) == text


def test_a_section_inserted_in_number_order():
    text = merged(OLD, ["# H", ""], {"2": ["## 2. Apply overhead", "x"]}, [])
    assert text.index("## 1. Align") < text.index("## 2. Apply") < text.index("## 4. Conv")
    assert section_number(["## 3. Peak memory"]) == "3"
