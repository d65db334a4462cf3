"""Problems and prompts: test sets (refused for calibration and training), seeded training splits, local files."""
