install.sh --agent takes --fence-after=SECONDS (written as fence_after in agent.toml); the packaged agent.toml example shows it.
