# NYU DPT probe, ViT-B (PROTOCOLS E): the DPT head of dpt_vit_base.py on a FROZEN backbone; the
# paper's "linear" NYU number (the reference's `..._proteus_probing.py`).
# Frozen: the inherited drop path never acts (the backbone stays in eval mode).
_base_ = ["./dpt_vit_base.py"]
protocol_name = "Proteus NYU DPT probe"
model = dict(backbone=dict(frozen=True))
