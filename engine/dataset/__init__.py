"""Dataset-scale extraction: a folder (or glob, or list) of images in, features and an index out.

One job per module, in the order data flows through a run:
    sources      which files are images of the run, and the relative name each one keeps
    naming       the output files an image's features are written to (mirroring its relative name)
    run_file     the settings a run was made with, written once; --resume compares them field by field
    output_folder what a run may do with its output folder (refusals, a new run, a resumed one), decided up front
    index        one record per image, appended atomically as it finishes; what counts as complete
    distributed  torch.distributed under torchrun / accelerate launch: rank, world, barriers, the split
    progress     the per-rank progress bar and the final summary line
    runner       the loop: skip what is complete, decode, extract every t, save, record, survive bad files
"""
