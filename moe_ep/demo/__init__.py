"""A trained demo of the built-in MoE-DiT: a procedural shapes data set (shapes.py), a
non-learned classifier of its images (classify.py), the training-time MoE feed-forward
(train_moe.py) and the prompt-adherence measure (adherence.py). docs/quickstart.md."""
