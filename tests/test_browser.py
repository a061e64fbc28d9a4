"""The browser harness itself: it must see a console error and a request that leaves the machine."""

from browser import open_page


def test_harness_reports_console_errors_and_network_requests(chromium, tmp_path):
    page = tmp_path / "page.html"
    page.write_text(
        "<!doctype html><html><head><script src='https://cdn.example.org/lib.js'></script></head>"
        "<body><script>console.error('boom'); document.body.dataset.done = '1';</script></body></html>"
    )
    visit = open_page(chromium, page)
    assert any("boom" in message for message in visit.console_errors)
    assert visit.network_requests == ["https://cdn.example.org/lib.js"]


def test_harness_passes_a_clean_offline_page(chromium, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<!doctype html><html><body><p id='x'>ok</p></body></html>")
    visit = open_page(chromium, page)
    assert visit.console_errors == []
    assert visit.network_requests == []
    assert chromium.find_element("id", "x").text == "ok"
