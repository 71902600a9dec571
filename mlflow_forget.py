"""Unlearn with any registered method, evaluate after every unlearning epoch, and track the run with mlflow.

    python -u mlflow_forget.py --save_dir ./results/cifar10 \
        --mask ./results/cifar10/1resnet18_ep100model_SA_best.pth.tar --unlearn VarGrad --unlearn_epochs 4 \
        --unlearn_lr 0.0001 --data ./data --dataset cifar10 --seed 1 --arch resnet18 --epochs 100 \
        --num_indexes_to_replace 450 --beta 0.9 --quantile 0.55 --class_to_replace -1
    (offline: --dataset digits or digits_noisy)

A missing original model at --mask is trained first with --epochs (as main_baseline.py would), and so is a missing
Retrain reference of the split. Tracking: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here; experiment
'<dataset>-<scenario>' unless --experiment; `mlflow ui --backend-store-uri sqlite:///mlflow.db` to browse.
The result JSON ({save_dir}/{unlearn}eval_result.json, or --result_json) is written whatever happens to tracking.
"""
from arg_parser import parse_config
from pipeline.runs import experiment_name, tracked_forget
from pipeline.stages import format_result_line, prepare
from tracking import NullTracker, open_tracker
from utils import cli_main


def main(argv=None) -> int:
    config = parse_config(argv, "mlflow_forget.py", __doc__)
    prepared = prepare(config)  # data and forget set checked before the tracking backend and any training
    if config.tracking.enabled:
        tracker, experiment_id = open_tracker(experiment_name(config))
    else:
        tracker, experiment_id = NullTracker(), None
    result = tracked_forget(config, tracker, experiment_id, p=prepared)
    where = f"; mlflow run {result['tracking']['run_id']} at {tracker.uri}" if result.get("tracking") else ""
    print(f"{config.method.name}: {format_result_line(result)} -> {result['result_file']}{where}")
    return 0


if __name__ == "__main__":
    cli_main(main)
