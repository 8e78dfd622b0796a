"""Launching: executors (local processes, submitit debug, SLURM through submitit) and the rank /
rendezvous environment of a submitit job. Preemption (signal -> checkpoint -> requeue) is the
loop's: ``training/preemption.py``."""
