# NYU 1x1 probe, ViT-S: frozen backbone, the 4 levels resized and concatenated, a 1x1 conv to one
# depth channel, SiLog; AdamW 4e-4, wd 0.01, 25k iterations, 4 images per GPU. Not the paper's
# "linear" NYU protocol (that is dpt_probe_vit_small.py: the DPT head on the frozen backbone).
_base_ = ["./nyu_base.py"]
protocol_name = "Proteus NYU 1x1 probe"
embed_dim = 384
model = dict(
    backbone=dict(frozen=True),
    decode_head=dict(
        type="LinearDepthHead",
        in_channels=[embed_dim] * 4,
        in_index=[0, 1, 2, 3],
        input_transform="resize_concat",
        channels=4 * embed_dim,
        num_convs=0,
        concat_input=False,
        dropout_ratio=0.0,
        norm_cfg=None,
        align_corners=False,
    ),
)
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=4e-4, betas=(0.9, 0.999), weight_decay=0.01))
