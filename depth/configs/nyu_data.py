# NYU-Depth V2's data, shared by every NYU config (nyu_base.py's protocol and DINOv3's, dinov3_linear.py): the
# splits, the keys a packed sample keeps, the metric. Each protocol adds its pipelines and batch size.
_base_ = ["../../segmentation/configs/runtime.py"]

data_root = "data/nyu"
dataset_type = "NYUDataset"
meta_keys = ("img_path", "depth_map_path", "ori_shape", "img_shape", "pad_shape", "scale_factor", "flip",
             "flip_direction", "category_id")  # fmt: skip
train_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/train", depth_map_path="annotations/train"),
    ),
)
val_dataloader = dict(
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path="images/test", depth_map_path="annotations/test"),
    ),
)
test_dataloader = val_dataloader
# valid gt in (0.001, 10) m inside the Eigen crop rows 45:471, cols 41:601; per image, then averaged
val_evaluator = dict(type="DepthMetric", min_depth_eval=1e-3, max_depth_eval=10.0, crop_type="nyu_crop")
test_evaluator = val_evaluator
