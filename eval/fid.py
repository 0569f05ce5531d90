"""Sample with the standard protocol and score FID / IS / KID / precision-recall; same as `vartk fid`.

    python eval/fid.py --model var-d16 --reference VIRTUAL_imagenet256_labeled.npz --out runs/var-d16
    torchrun --nproc_per_node=8 eval/fid.py --model llamagen-xl --reference ref.npz --out runs/llamagen-xl
"""
from vartk.evaluation import main

if __name__ == "__main__":
    main()
