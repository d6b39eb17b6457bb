"""The CLI's progress bar, fed by hetrain.progress events (rich ships with Prefect)."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hetrain import progress


class TrainProgress:
    """A rounds bar and a batches bar, with the latest accuracy in the description."""

    def __init__(self, name: str):
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=False)
        self.name, self.rounds, self.batches = name, None, None

    def __enter__(self):
        progress.subscribe(self.on_event)
        self.progress.start()
        self.rounds = self.progress.add_task(f"{self.name}: preparing owners", total=None)
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def stop(self) -> None:
        progress.unsubscribe(self.on_event)
        self.progress.stop()

    def on_event(self, event: str, data: dict) -> None:
        if event == "run-started":
            done = len(data["done_rounds"])
            self.progress.update(self.rounds, total=data["total"], completed=done,
                                 description=f"{self.name}: rounds")
        elif event == "batch-done":
            if self.batches is None:
                self.batches = self.progress.add_task("  batches", total=data["total"])
            self.progress.update(self.batches, completed=data["done"], total=data["total"],
                                 description=f"  round {data['round']} batches")
        elif event == "round-done":
            row = data["row"]
            twin = row.get("twin_test_accuracy")
            text = f"{self.name}: round {row['round']} test acc {row['test_accuracy']:.3f}"
            text += f" (twin {twin:.3f})" if twin is not None else ""
            self.progress.update(self.rounds, completed=row["round"], description=text)
