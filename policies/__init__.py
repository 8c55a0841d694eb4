"""Policy files (YAML) shipped with kmd: the documented example policy lives here."""
