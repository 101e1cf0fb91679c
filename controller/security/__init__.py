"""Authentication building blocks: keys, passwords, TOTP, tokens, throttling."""
