"""GeneralPoints, the language-only "make 24" card game (spec: generalpoints.md, "GP").

    from tasks.generalpoints import deal, render_prompt, score
    hand = deal("ood", seed=42, index=7)           # cards ('2', 'A', 'Q', 'K')
    s = score(response, hand, mode="exact")         # s.reward, s.outcome, s.reason

Modules, in the order a hand flows through them: `cards` (§1, §2), `solver` (§3),
`prompt` (§4, §5), `verifier` (§6, §7), `episode` (§8), `metrics` (§7.2, §9),
`sft_wrong` (the multi-turn SFT option of §5).
"""

from tasks.generalpoints.cards import SPLITS, Hand, deal, hand_key, make_hand, overlap_key
from tasks.generalpoints.episode import Episode
from tasks.generalpoints.metrics import OUTCOMES, outcome_of
from tasks.generalpoints.prompt import FACE, failure_message, reference_answer, render_prompt
from tasks.generalpoints.sft_wrong import wrong_attempt
from tasks.generalpoints.solver import solve
from tasks.generalpoints.verifier import MODES, Score, evaluate, extract_formula, score

__all__ = [
    "FACE",
    "MODES",
    "OUTCOMES",
    "SPLITS",
    "Episode",
    "Hand",
    "Score",
    "deal",
    "evaluate",
    "extract_formula",
    "failure_message",
    "hand_key",
    "make_hand",
    "outcome_of",
    "overlap_key",
    "reference_answer",
    "render_prompt",
    "score",
    "solve",
    "wrong_attempt",
]
