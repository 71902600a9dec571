"""One run as a pipeline of stages: `config` (typed settings) -> `stages` (data and split, models, unlearning,
evaluation, files) -> `mia` (per-example attacks) -> `runs` (the stages composed for the entry scripts and the
benchmark's cells). `paths` holds every file-name rule."""
