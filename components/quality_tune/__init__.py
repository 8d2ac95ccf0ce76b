"""Quality-tune stage: Emu-style small-LR fine-tune on the highest-quality curated samples."""
