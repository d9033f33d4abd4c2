"""Running one model over several processes: tensor parallelism (attention heads, MLP and vocabulary split
across ranks, one all-reduce per block half), expert parallelism for MoE (experts spread across ranks), and
the executor that keeps one scheduler (the driver, rank 0) and broadcasts each step's batch to the workers.

Files, one job each:
- group.py     ParallelGroup: the only holder of a torch.distributed process group (gloo on CPU, NCCL on GPU).
- slicing.py   cut rows or columns out of a linear layer, full-precision or quantized (codes and scales).
- layers.py    the parallel modules: row-parallel output, vocabulary-parallel embedding and lm_head,
               expert-parallel experts.
- shard.py     the preparation pass: a loaded (and possibly quantized) model -> this rank's shard, in place.
               The model files know nothing of parallelism.
- worker.py    a worker process: load, shard, then run the steps the driver broadcasts.
- executor.py  the driver's side: start the workers (torch.multiprocessing or Ray), hand each step out.
"""
