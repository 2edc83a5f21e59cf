# ADE20K linear probe, ViT-S (PROTOCOLS D): frozen backbone, the 4 levels resized and concatenated,
# a BN-free 1x1 conv to 150 classes; AdamW 8e-4, wd 0.05, 60k iterations, 8 images per GPU.
_base_ = ["./ade20k_base.py"]
protocol_name = "Proteus ADE20K linear probe"
embed_dim = 384
model = dict(
    backbone=dict(frozen=True),
    decode_head=dict(
        type="FCNHead",
        in_channels=[embed_dim] * 4,
        in_index=[0, 1, 2, 3],
        input_transform="resize_concat",
        channels=4 * embed_dim,
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
