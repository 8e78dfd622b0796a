"""Launching: executors (local processes, submitit debug, SLURM through submitit), the rank /
rendezvous environment of a submitit job, and preemption (signal -> checkpoint -> requeue)."""
