"""Demo: port a torchvision ViT into timm's ViT, where almost no parameter name agrees.

torchvision: conv_proj, class_token, encoder.pos_embedding, encoder.layers.encoder_layer_0.ln_1, ...
timm:        patch_embed.proj, cls_token, pos_embed, blocks.0.norm1, ...

Run:  bash scripts/demo.sh    (or: python examples/demo.py once set up)
"""

import timm
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import archalign


def main() -> None:
    torch.manual_seed(0)
    src = VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=4,
                            hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    nn.init.normal_(src.heads.head.weight, std=0.2)  # torchvision zero-initialises the head
    nn.init.normal_(src.heads.head.bias, std=0.2)
    torch.manual_seed(1)
    dst = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
        num_classes=10, global_pool="token").eval()
    x = torch.randn(2, 3, 32, 32)

    key_names_agree = len(set(src.state_dict()) & set(dst.state_dict()))
    print(f"source keys: {len(src.state_dict())}, destination keys: {len(dst.state_dict())}, "
          f"keys with the same name: {key_names_agree}\n")

    plan = archalign.align(src, dst)  # propose; touches no weights
    print(plan)
    print()
    report = plan.apply(dst)  # load what the plan says
    print(report)

    with torch.no_grad():
        diff = (src(x) - dst(x)).abs().max().item()
    print(f"\nmax |torchvision(x) - timm(x)| after the load: {diff:.3g}")
    if diff > 1e-5:
        raise SystemExit("the ported model does not reproduce the source")


if __name__ == "__main__":
    main()
