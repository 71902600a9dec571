"""Backdoor cleanse: poison training samples with a trigger, train (or load) the backdoored model, unlearn the poisoned
samples with any registered method, and report clean accuracy and attack success rate (ASR) before and after.

    python -u main_backdoor.py --save_dir ./results/cifar10 --mask ./results/cifar10/backdoor.pth.tar --unlearn FT \
        --num_indexes_to_replace 4500 --class_to_replace 0 --trigger_size 4 --dataset cifar10 --arch resnet18 --seed 1
    python main_backdoor.py --dataset digits --save_dir results/digits_backdoor --num_indexes_to_replace 130 \
        --class_to_replace 0 --width 8 --epochs 15 --decreasing_lr 10 --unlearn FT --unlearn_lr 0.1 --unlearn_epochs 12

--class_to_replace is the target label, --num_indexes_to_replace the number of poisoned training samples (drawn across
all classes), --trigger_size the side of the black square 2 pixels from the bottom-right corner (default 4 on 32x32
images, 2 on 8x8). The backdoored model is trained into --mask (default: a descriptive name in --save_dir) when that
file does not exist. Writes {save_dir}/{unlearn}backdoor_result.json (or --result_json) and
{save_dir}/{unlearn}backdoor_checkpoint.pth.tar (not with --no-save-model). Tracked with mlflow only with --track or
when MLFLOW_TRACKING_URI is set (experiment '<dataset>-backdoor' unless --experiment).
"""
from arg_parser import parse_config
from scenarios.backdoor import experiment_name, format_backdoor_line, run_backdoor, setup_backdoor
from tracking import open_tracker
from utils import cli_main


def main(argv=None) -> int:
    config = parse_config(argv, "main_backdoor.py", __doc__)
    bd = setup_backdoor(config)  # bad input fails here, before anything is written or tracked
    tracker = experiment_id = None
    if config.tracking.enabled:
        tracker, experiment_id = open_tracker(experiment_name(config))
    result = run_backdoor(bd, tracker, experiment_id)
    where = f"; mlflow run {result['tracking']['run_id']} at {tracker.uri}" if result.get("tracking") else ""
    print(f"{config.method.name}: {format_backdoor_line(result)} -> {result['result_file']}{where}")
    return 0


if __name__ == "__main__":
    cli_main(main)
