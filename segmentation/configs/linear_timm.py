# ADE20K linear probe, any timm student (docs/protocols.md, "Students that are not our ViTs"): the ViT probe's
# setting (linear_vit_small.py) on the backbone's last map: frozen, a BN-free 1x1 conv to 150 classes on that
# map, the logits upsampled; AdamW 8e-4, wd 0.05, 60k iterations, 8 images per GPU. The head's width is the
# backbone's, filled in from its feature_info by the runner.
_base_ = ["./ade20k_base.py"]
protocol_name = "Proteus ADE20K linear probe (timm student)"
model = dict(
    backbone=dict(_delete_=True, type="ProteusTimm", checkpoint=None, out_indices=None, frozen=True),
    decode_head=dict(
        type="FCNHead",
        in_channels=None,  # the last map's width
        in_index=-1,
        channels=None,  # = in_channels: no conv before the classifier
        num_convs=0,
        concat_input=False,
        dropout_ratio=0.0,
        num_classes=150,
        norm_cfg=None,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
)
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=8e-4, betas=(0.9, 0.999), weight_decay=0.05))
