# Runtime shared by every ADE20K and NYU config: the backbone, loops, hooks, logging, visualisation.
custom_imports = dict(imports=["segmentation.mmseg_ext"], allow_failed_imports=False)
# the backbone of every task (ViT-S/B block indices; the large configs set theirs); its checkpoint is set
# from --backbone by segmentation.main / depth.main. The task bases add the data preprocessor and heads.
model = dict(
    backbone=dict(type="ProteusViT", checkpoint=None, img_size=518, out_indices=(3, 5, 7, 11), final_norm=False)
)
# loaders: the task bases add batch_size (per GPU) and the dataset
train_dataloader = dict(num_workers=8, persistent_workers=True, sampler=dict(type="InfiniteSampler", shuffle=True))
val_dataloader = dict(
    batch_size=1, num_workers=4, persistent_workers=True, sampler=dict(type="DefaultSampler", shuffle=False)
)
test_dataloader = val_dataloader
train_cfg = dict(type="IterBasedTrainLoop")  # the task bases set max_iters and val_interval
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
default_scope = "mmseg"
env_cfg = dict(cudnn_benchmark=True, mp_cfg=dict(mp_start_method="fork"), dist_cfg=dict(backend="nccl"))
vis_backends = [dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer", alpha=0.5)
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=4000, max_keep_ckpts=2),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
# every evaluation during training -> <work_dir>/evaluations.jsonl (the runner's best-on-test figure)
custom_hooks = [dict(type="EvaluationHistoryHook")]
