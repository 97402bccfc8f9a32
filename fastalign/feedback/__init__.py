"""AI feedback: Constitutional AI (critique and revise), RLAIF preference labels, LLM-as-judge evaluation.

    constitution.py  constitutions and judge rubrics as validated YAML/JSON data (defaults in data/feedback/)
    prompts.py       the conversations sent to a model, seeded principle draws, verdict parsing
    engine.py        TextModel: a GenerationBackend + tokenizer as text in / text out; choice-token scoring
    verdicts.py      a verdict among a few labels, from log-probs or from parsed text (one retry)
    revise.py        `fastalign cai revise`: prompts -> critique/revision rounds -> an SFT file
    label.py         `fastalign cai label`: sampled pairs -> order-averaged ensemble labels -> a DPO/RM file
    judge.py         `fastalign judge answer|pairwise|single`: verdicts, summary, chart
    stats.py         bootstrap intervals, the length-controlled win rate, position bias, categories
    io.py            validated input rows; the fsynced, resumable JSONL journal every stage writes
    config.py, cli.py, chart.py

The recipe from prompts to a judged DPO model is docs/feedback.md.
"""
