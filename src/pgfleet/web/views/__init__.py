"""One module per page type; each declares a :class:`Page` whose ``build``
returns the page's data, served as HTML at ``PATH`` and as JSON at
``PATH.json``.

A page's data is made of named parts (``charts``, ``top_queries``...).  The
HTML page asks only for the parts its tables show; its charts then load
``PATH.json?_only=charts,markers`` with the same range.  ``PATH.json`` alone
has everything.
"""
