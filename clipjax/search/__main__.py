from clipjax.search.cli import run

run()
