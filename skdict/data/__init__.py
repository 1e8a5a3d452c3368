"""Where rows come from (:mod:`.sources`) and where codes go (:mod:`.codes`)."""
