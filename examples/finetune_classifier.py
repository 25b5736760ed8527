"""Fine-tune GPT-2 small to tell spam from ham: the book's chapter 6 (and appendix E).

    python examples/finetune_classifier.py                          # downloads the data and GPT-2
    python examples/finetune_classifier.py --data SMSSpamCollection --pretrained DIR
    python examples/finetune_classifier.py --lora-rank 16 --lora-alpha 16   # appendix E: LoRA
    numpygpt classify --model runs/classifier "You are a winner! Call now to claim your prize"

The book's recipe by default: the SMS Spam Collection (label<TAB>text lines; any such
file, or a CSV with Label,Text columns, via --data), ham undersampled to spam's size and
split 70/10/20 (seed 123), texts padded with <|endoftext|> to the longest training text;
GPT-2 small (--pretrained: a Hugging Face directory or a name) with dropout 0 and a new
2-class head; the last transformer block, the final LayerNorm and the head trained with
AdamW (lr 5e-5, weight decay 0.1) for 5 epochs, batch 8, losses every 50 steps over 5
batches. It prints the trainable-parameter count, the losses and the accuracies, and
writes the model, loss.png, accuracy.png and history.json into runs/classifier. Every
option of `numpygpt finetune classify` works here (see --help): this script is that command.
"""

import os
import sys

# run from a checkout without installing: make the repository importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numpygpt.cli import finetune_classify_main  # noqa: E402

if __name__ == "__main__":
    finetune_classify_main(description=__doc__.split("\n\n")[0])
