"""Fine-tuning tasks built on the model and the training loop (imported by nothing below them).

    numpygpt.finetune.classify_data   labelled texts: read, balance, split, tokenise and pad
    numpygpt.finetune.classify        the classifier's loop, accuracy, plots, the commands
"""
