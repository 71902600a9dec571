"""Unlearn with any registered method, evaluate after every unlearning epoch, and track the run with mlflow.

    python -u mlflow_forget.py --save_dir ./results/cifar10 --mask ./results/cifar10/1resnet18_ep100model_SA_best.pth.tar \
        --unlearn VarGrad --unlearn_epochs 4 --unlearn_lr 0.0001 --data ./data --dataset cifar10 --seed 1 \
        --arch resnet18 --epochs 100 --num_indexes_to_replace 450 --beta 0.9 --quantile 0.55 --class_to_replace -1
    (offline: --dataset digits or digits_noisy)

A missing original model at --mask is trained first with --epochs (as main_baseline.py would), and so is a missing
Retrain reference of the split. Tracking: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here; experiment
'<dataset>-<scenario>' unless --experiment; `mlflow ui --backend-store-uri sqlite:///mlflow.db` to browse.
The result JSON ({save_dir}/{unlearn}eval_result.json, or --result_json) is written whatever happens to tracking.
"""
from experiment import format_result_line
from pipeline import experiment_name, parse_forget_args, run_forget
from tracking import NullTracker, open_tracker
from utils import cli_main


def main(argv=None) -> int:
    args = parse_forget_args(argv, description=__doc__)
    if args.list_methods:
        from main_forget import print_methods

        print_methods()
        return 0
    # The backend is checked before anything is trained or written.
    tracker, experiment_id = open_tracker(experiment_name(args)) if args.track else (NullTracker(), None)
    result = run_forget(args, tracker, experiment_id)
    where = f"; mlflow run {result['tracking']['run_id']} at {tracker.uri}" if result.get("tracking") else ""
    print(f"{args.unlearn}: {format_result_line(result)} -> {result['result_file']}{where}")
    return 0


if __name__ == "__main__":
    cli_main(main)
