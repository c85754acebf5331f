"""
What the console's browser tests share (tests/console/test_browser.py in Chromium,
tests/console/test_firefox.py in Firefox): scripts run in the page, and a bounded poll of one.

A browser here is anything with C{async js(script, *args)} running C{script} as the body of a
function in the page (WebDriver's C{execute_script}: C{arguments[i]}, C{return ...}).
"""

from twisted.internet import reactor

from zwrm.testing.processes import poll


async def wait_js(browser, script, timeout, what, *args):
    """Poll C{script} in the page until it returns something true; return that."""
    return await poll(reactor, lambda: browser.js(script, *args), timeout, interval=0.25, what=what)


LOGIN = """
document.getElementById('token').value = arguments[0];
document.getElementById('authid').value = '';
document.getElementById('login').requestSubmit();
"""

ROWS = """
return [...document.querySelectorAll(arguments[0])].map(e => Object.assign({}, e.dataset));
"""

TWO_READY_HOSTS = """
const r = [...document.querySelectorAll('#hosts-table tr[data-host]')].map(e => Object.assign({}, e.dataset));
return r.length === 2 && r.every(h => h.state === 'ready') && r;
"""
