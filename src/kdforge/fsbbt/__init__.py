"""FS-BBT: black-box few-shot knowledge distillation (Nguyen et al., ECCV 2022): MixUp pool, CVAE, soft labels."""
