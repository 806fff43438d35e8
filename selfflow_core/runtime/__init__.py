"""How a run executes: processes and parallel strategies, optimizer, assembly of the live
objects, run-directory guard and signals, progress, CPU threads, step losses and checkpoints."""
