# ADE20K UperNet fine-tuning, any timm student (docs/protocols.md, "Students that are not our ViTs"): UPerHead
# over the backbone's four stages as mmseg runs ResNet and ConvNeXt (512 channels, pool scales 1, 2, 3, 6), an
# auxiliary FCNHead (0.4) on the stride-16 stage; a single-stride model (a ViT) gets Feature2Pyramid
# [4, 2, 1, 0.5] first, as our ViT configs. The ViT protocol's data and schedule (518 crops, AdamW 1e-4, wd
# 0.05, drop path 0.1, 60k iterations, 8 images per GPU) with layer-wise lr decay 0.9 (ConvNeXt's UperNet rate)
# over timm's own layer grouping. The head widths are the backbone's, filled in by the runner.
_base_ = ["./ade20k_base.py"]
protocol_name = "Proteus ADE20K UperNet (timm student)"
norm_cfg = dict(type="SyncBN", requires_grad=True)  # plain BN when not distributed
sync_bn = "torch"  # the backbone's BatchNorm synchronised too, as mmseg's ResNet configs (distributed CUDA runs)
model = dict(
    backbone=dict(_delete_=True, type="ProteusTimm", checkpoint=None, out_indices=None, drop_path_rate=0.1),
    decode_head=dict(
        type="UPerHead",
        in_channels=None,  # the four stages' widths
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=None,  # the stride-16 stage's width
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
)
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor="TimmLayerDecayOptimizerConstructor",
    paramwise_cfg=dict(decay_rate=0.9),
)
