# NYU DPT fine-tuning, ViT-S (PROTOCOLS E): readout "project", post-process channels [48, 96, 192, 384],
# 256 fusion channels, 4 fusion blocks, a 1-channel output conv; SiLog; AdamW 4e-4, wd 0.01, backbone
# lr x 0.1; 25k iterations, 4 images per GPU.
_base_ = ["./nyu_base.py"]
embed_dim = 384
model = dict(
    backbone=dict(with_cls_token=True),
    decode_head=dict(
        type="DPTDepthHead",
        in_channels=[embed_dim] * 4,
        in_index=[0, 1, 2, 3],
        input_transform="multiple_select",
        embed_dims=embed_dim,
        post_process_channels=[48, 96, 192, 384],
        readout_type="project",
        patch_size=14,
        channels=256,
        dropout_ratio=0.0,
        norm_cfg=None,
        act_cfg=dict(type="ReLU"),
        align_corners=False,
    ),
)
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=4e-4, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={"backbone": dict(lr_mult=0.1)}),
)
