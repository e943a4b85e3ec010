"""Where merchant data comes from besides a merchant's own folder: the bundled real datasets'
adapters (``adapters``) and the seeded synthetic generator (``synthetic``). Both produce the one
documented format (``client.data``); a ClientApp resolves ``synthetic:N`` through here."""
