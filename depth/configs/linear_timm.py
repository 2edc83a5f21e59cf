# NYU 1x1 probe, any timm student (docs/protocols.md, "Students that are not our ViTs"): the ViT probe's setting
# (linear_vit_small.py) on the backbone's last map: frozen, a 1x1 conv to one depth channel on that map, the
# prediction upsampled, SiLog; AdamW 4e-4, wd 0.01, 25k iterations, 4 images per GPU. The head's width is the
# backbone's, filled in from its feature_info by the runner.
_base_ = ["./nyu_base.py"]
protocol_name = "Proteus NYU 1x1 probe (timm student)"
model = dict(
    backbone=dict(_delete_=True, type="ProteusTimm", checkpoint=None, out_indices=None, frozen=True),
    decode_head=dict(
        type="LinearDepthHead",
        in_channels=None,  # the last map's width
        in_index=-1,
        channels=None,  # = in_channels: no conv before the output conv
        num_convs=0,
        concat_input=False,
        dropout_ratio=0.0,
        norm_cfg=None,
        align_corners=False,
    ),
)
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=4e-4, betas=(0.9, 0.999), weight_decay=0.01))
