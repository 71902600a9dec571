"""Train the original model (or, with --retrain, the Retrain reference on the retain set).

    python -u main_baseline.py --data ./data --dataset cifar10 --arch resnet18 --save_dir ./results/cifar10 \
        --epochs 10 --num_indexes_to_replace 4500
    python main_baseline.py --dataset digits --save_dir results/digits    # offline, about a minute on 2 CPU cores
"""
from arg_parser import parse_config
from pipeline.stages import prepare, train_reference
from utils import cli_main


def main(argv=None) -> int:
    config = parse_config(argv, "main_baseline.py", __doc__)
    retrain = config.extras["retrain"]
    prepared = prepare(config, need_forget=retrain)
    summary = train_reference(prepared, retrain=retrain, resume=config.output.resume)
    acc = summary["accuracy"]
    print(f"{summary['kind']} model: test {acc['test']:.2f} %, val {acc['val']:.2f} %, train {acc['train']:.2f} % "
          f"(best epoch {summary['best_epoch']}, {summary['train_seconds']:.1f} s on {summary['device']}) "
          f"-> {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    cli_main(main)
