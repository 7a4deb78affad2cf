"""V-IRL-L, the language-only navigation task (issue 17): routes (`routes`), and the
instruction, rail, prompt, verifier and episode (`navigation`)."""
