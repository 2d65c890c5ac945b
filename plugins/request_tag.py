"""An example stage plugin: copy it, rename it, change it.

It tags every upstream request with a header naming who called, and echoes the tag
back to the client. Its settings are its own config section::

    request_tag:
      header: x-aiproxy-tag      # the header to set (default x-aiproxy-tag)
      value: my-team             # a fixed tag; default: the caller's team, user or id

Any ``*.py`` file in the plugins folder (``plugins.dir``) is loaded at start-up; the
file's name is the plugin's name (``plugins: {disable: [request_tag]}`` turns it off).
As a pip package, declare it as an entry point instead::

    [project.entry-points.aiproxy]
    request_tag = "my_package.request_tag"
"""

from aiproxy import hookimpl


@hookimpl
async def aiproxy_before_call(call, settings):
    """Runs before every upstream call, after authentication; may be async."""
    header = settings.get("header", "x-aiproxy-tag")
    principal = call.principal
    tag = settings.get("value") or (principal and (principal.team or principal.user or principal.id))
    if tag:
        call.upstream_headers[header] = str(tag)
        call.response_headers[header] = str(tag)
