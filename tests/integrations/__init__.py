"""Tests of fastalign inside TRL's trainers and Hugging Face models (``fastalign.integrations``)."""
