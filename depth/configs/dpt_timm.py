# NYU DPT fine-tuning, any timm student (docs/protocols.md, "Students that are not our ViTs"): DPT's 3x3 convs
# (256 channels), fusion blocks and output conv over the backbone's four stages (DPTStagesDepthHead: stage maps
# have the strides DPT reassembles a ViT's tokens to), SyncBN, dropout 0.1; a single-stride model (a ViT) gets
# Feature2Pyramid [4, 2, 1, 0.5] first. The ViT protocol otherwise (dpt_vit_small.py): SiLog, drop path 0.1,
# AdamW 4e-4, wd 0.01, the backbone at lr x 0.1, 25k iterations, 4 images per GPU. Widths filled in by the runner.
_base_ = ["./nyu_base.py"]
protocol_name = "Proteus NYU DPT (timm student)"
norm_cfg = dict(type="SyncBN", requires_grad=True)  # plain BN when not distributed
sync_bn = "torch"  # the backbone's BatchNorm synchronised too, as mmseg's ResNet configs (distributed CUDA runs)
model = dict(
    backbone=dict(_delete_=True, type="ProteusTimm", checkpoint=None, out_indices=None, drop_path_rate=0.1),
    decode_head=dict(
        type="DPTStagesDepthHead",
        in_channels=None,  # the four stages' widths
        in_index=[0, 1, 2, 3],
        input_transform="multiple_select",
        channels=256,
        dropout_ratio=0.1,
        norm_cfg=norm_cfg,
        act_cfg=dict(type="ReLU"),
        align_corners=False,
    ),
)
# as dpt_vit_small.py gives its backbone's blocks: every backbone parameter at lr x 0.1, with weight decay
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=4e-4, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={"backbone": dict(lr_mult=0.1)}),
)
