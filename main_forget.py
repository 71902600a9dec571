"""Unlearn a trained model with any registered method and evaluate it against the Retrain reference.

    python -u main_forget.py --save_dir ./results/cifar10 \
        --mask ./results/cifar10/1resnet18_ep100model_SA_best.pth.tar --unlearn VarGrad --unlearn_epochs 4 \
        --unlearn_lr 0.0001 --data ./data --dataset cifar10 --seed 1 --arch resnet18 --epochs 100 \
        --num_indexes_to_replace 450 --beta 0.9 --quantile 0.55 --class_to_replace -1
Writes {save_dir}/{unlearn}eval_result.json and {save_dir}/{unlearn}checkpoint.pth.tar.
"""
from arg_parser import parse_config
from pipeline import paths
from pipeline.runs import forget
from pipeline.stages import format_result_line
from utils import cli_main


def main(argv=None) -> int:
    config = parse_config(argv, "main_forget.py", __doc__)
    result = forget(config)
    print(f"{config.method.name}: {format_result_line(result)} -> {paths.forget_result(config)}")
    return 0


if __name__ == "__main__":
    cli_main(main)
