# NYU DPT probe, any timm student: the head of dpt_timm.py on a FROZEN backbone, as dpt_probe_vit_small.py is
# the paper's "linear" NYU protocol for our ViTs.
_base_ = ["./dpt_timm.py"]
protocol_name = "Proteus NYU DPT probe (timm student)"
model = dict(backbone=dict(frozen=True))
