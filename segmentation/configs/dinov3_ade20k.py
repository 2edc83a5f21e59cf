# ADE20K at DINOv3's dense evaluation setting (PROTOCOLS G): 512 crops, a 32x32 grid of patch 16.
# The `*_dinov3.py` configs inherit the DINOv2-layout config of their head and size and take from here
# what depends on the crop: ade20k_base.py's pipelines and windows at 512 (resize to short side 512,
# long side at most 4 x 512; slide stride 2/3 of the crop, 341, as mmseg's 512 configs). One key,
# `dinov3_dense`, so this file sits beside any ADE20K config in `_base_` (bases must not share a key).
crop = (512, 512)
dinov3_dense = dict(
    train_dataloader=dict(
        dataset=dict(
            pipeline=[
                dict(type="LoadImageFromFile"),
                dict(type="LoadAnnotations", reduce_zero_label=True),
                dict(type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
                dict(type="RandomCrop", crop_size=crop, cat_max_ratio=0.75),
                dict(type="RandomFlip", prob=0.5),
                dict(type="PhotoMetricDistortion"),
                dict(type="PackSegInputs"),
            ]
        )
    ),
    val_dataloader=dict(
        dataset=dict(
            pipeline=[
                dict(type="LoadImageFromFile"),
                dict(type="Resize", scale=(2048, 512), keep_ratio=True),
                dict(type="LoadAnnotations", reduce_zero_label=True),
                dict(type="PackSegInputs"),
            ]
        )
    ),
    model=dict(data_preprocessor=dict(size=crop), test_cfg=dict(mode="slide", crop_size=crop, stride=(341, 341))),
)
del crop
