"""Unlearn a trained model with any registered method and evaluate it against the Retrain reference.

    python -u main_forget.py --save_dir ./results/cifar10 --mask ./results/cifar10/1resnet18_ep100model_SA_best.pth.tar \
        --unlearn VarGrad --unlearn_epochs 4 --unlearn_lr 0.0001 --data ./data --dataset cifar10 --seed 1 \
        --arch resnet18 --epochs 100 --num_indexes_to_replace 450 --beta 0.9 --quantile 0.55 --class_to_replace -1
Writes {save_dir}/{unlearn}eval_result.json and {save_dir}/{unlearn}checkpoint.pth.tar.
"""
from arg_parser import parse_args
from experiment import format_result_line, result_paths, setup_run, unlearn_and_evaluate
from unlearn import METHODS, ALIASES, list_methods
from utils import cli_main


def print_methods() -> None:
    for name in list_methods():
        if name in ALIASES:
            alias = ALIASES[name]
            target = alias.base + (f" + {alias.grad_mask}" if alias.grad_mask else "")
            print(f"{name:18s} = {target}  {alias.summary}")
        else:
            print(f"{name:18s} {METHODS[name].summary}")


def main(argv=None) -> int:
    args = parse_args(argv, description=__doc__)
    if args.list_methods:
        print_methods()
        return 0
    run = setup_run(args)
    result = unlearn_and_evaluate(run)
    print(f"{args.unlearn}: {format_result_line(result)} -> {result_paths(args)['result']}")
    return 0


if __name__ == "__main__":
    cli_main(main)
