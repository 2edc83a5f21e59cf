# ADE20K UperNet fine-tuning, ViT-S (PROTOCOLS D): Feature2Pyramid [4, 2, 1, 0.5], UPerHead with D
# channels, auxiliary FCNHead on level 2; AdamW 1e-4, wd 0.05, layer-wise lr decay 0.65 over our
# parameter names, drop path 0.1, 60k iterations, 8 images per GPU.
_base_ = ["./ade20k_base.py"]
protocol_name = "Proteus ADE20K UperNet"
embed_dim = 384
num_layers = 12
norm_cfg = dict(type="SyncBN", requires_grad=True)  # plain BN when not distributed
model = dict(
    backbone=dict(drop_path_rate=0.1),
    neck=dict(type="Feature2Pyramid", embed_dim=embed_dim, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
    decode_head=dict(
        type="UPerHead",
        in_channels=[embed_dim] * 4,
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=embed_dim,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=embed_dim,
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
    constructor="ViTLayerDecayOptimizerConstructor",
    # token_weight_decay=True: pos_embed and cls_token decayed, as in the reference (False: not decayed)
    paramwise_cfg=dict(num_layers=num_layers, decay_rate=0.65, token_weight_decay=True),
)
