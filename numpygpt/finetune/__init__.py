"""Fine-tuning tasks on top of a pretrained GPT (the book's chapters 6 and 7).

Each task is its own module (``numpygpt.finetune.instruct``, ...) with its data, collate
function, loop and metrics; nothing below this package imports it.
"""
