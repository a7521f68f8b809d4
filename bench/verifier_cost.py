"""What the synthesis verifier (`--verify-synthesis owlv2`, verify.py) costs beside the image it checks, on a GPU's
workload: the floating-point operations of one OWLv2 check against those of one SDXL outpainting, both at their real
sizes, counted by torch's FlopCounterMode (the count is the model's, not this machine's: no weights are needed).

    python bench/verifier_cost.py [--categories 5] [--steps 20]

  * the verifier: OWLv2-base (verify.OWLV2_CHECKPOINT's architecture: transformers' Owlv2Config defaults with the
    960-pixel input its image processor uses; 155M parameters), one image and --categories text queries;
  * the generation: SDXL's UNet (stabilityai/stable-diffusion-xl-base-1.0's unet/config.json; 2.57B parameters) at
    1024 x 1024 (latent 128 x 128), classifier-free guidance (batch 2), --steps denoising steps (train.py's 20). The
    ControlNet's own work is left out, so the verifier's share printed is an upper bound.
OWLv2 runs once on random weights on this CPU (its forward calls .item(), which meta tensors refuse); the UNet is
counted on the meta device.
"""
import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import code_commit  # noqa: E402  (after the path: bench/ runs as a script)

SDXL_UNET = dict(   # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the fields that shape the network)
    act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048, in_channels=4, layers_per_block=2, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], projection_class_embeddings_input_dim=2816,
    sample_size=128, transformer_layers_per_block=[1, 2, 10], use_linear_projection=True)


def owlv2_flops(categories: int) -> tuple[int, int]:
    """(parameters, FLOPs) of one OWLv2-base check: a 960 x 960 image, `categories` queries of 16 tokens."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection
    model = Owlv2ForObjectDetection(Owlv2Config(vision_config=dict(image_size=960))).eval()
    ids = torch.zeros(categories, 16, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.zeros(1, 3, 960, 960))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops()


def sdxl_unet_flops() -> tuple[int, int]:
    """(parameters, FLOPs) of one SDXL UNet call at 1024 x 1024 with classifier-free guidance (batch 2)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET).eval()
        x, context = torch.zeros(2, 4, 128, 128), torch.zeros(2, 77, 2048)
        added = {"text_embeds": torch.zeros(2, 1280), "time_ids": torch.zeros(2, 6)}
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(x, torch.tensor(981), encoder_hidden_states=context, added_cond_kwargs=added)
    return sum(p.numel() for p in unet.parameters()), counter.get_total_flops()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--categories", type=int, default=5, help="text queries of a check (an OVD sample's categories)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of a generation (train.py's GPU default)")
    a = p.parse_args(argv)
    owl_params, owl = owlv2_flops(a.categories)
    unet_params, unet = sdxl_unet_flops()
    generation = unet * a.steps
    result = {"commit": code_commit(), "owlv2_params": owl_params, "owlv2_tflops": owl / 1e12,
              "sdxl_unet_params": unet_params, "sdxl_unet_call_tflops": unet / 1e12, "steps": a.steps,
              "generation_tflops": generation / 1e12, "verifier_share": owl / generation}
    print(f"OWLv2-base check ({owl_params / 1e6:.0f}M parameters, {a.categories} categories): {owl / 1e12:.2f} TFLOPs")
    print(f"SDXL outpainting ({unet_params / 1e9:.2f}B-parameter UNet, 1024 px, CFG, {a.steps} steps): "
          f"{generation / 1e12:.0f} TFLOPs ({unet / 1e12:.1f} a step), ControlNet not counted")
    print(f"the verifier adds at most {100 * owl / generation:.2f} % to an image's work (at commit {result['commit']})")
    return result


if __name__ == "__main__":
    main()
