# NYU DPT fine-tuning, ViT-S (PROTOCOLS E): readout "project", post-process channels [48, 96, 192, 384],
# 256 fusion channels, 4 fusion blocks, SyncBN in the fusion residual units and the projection conv,
# dropout 0.1, a 1-channel output conv; SiLog; backbone drop path 0.1; AdamW 4e-4, wd 0.01; 25k
# iterations, 4 images per GPU.
_base_ = ["./nyu_base.py"]
protocol_name = "Proteus NYU DPT"
embed_dim = 384
norm_cfg = dict(type="SyncBN", requires_grad=True)  # plain BN when not distributed
model = dict(
    backbone=dict(with_cls_token=True, drop_path_rate=0.1),
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
        dropout_ratio=0.1,
        norm_cfg=norm_cfg,
        act_cfg=dict(type="ReLU"),
        align_corners=False,
    ),
)
# The reference's keys. mmengine applies the longest key a name contains, so backbone.*.pos_embed and
# backbone.*.cls_token get the full lr without weight decay, every other backbone parameter (norms
# included: "backbone" outranks "norm") lr x 0.1 with weight decay; the head's BN layers are named
# "bn", so "norm" matches no parameter.
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=4e-4, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            "pos_embed": dict(decay_mult=0.0),
            "cls_token": dict(decay_mult=0.0),
            "norm": dict(decay_mult=0.0),
            "backbone": dict(lr_mult=0.1),
        }
    ),
)
