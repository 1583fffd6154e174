"""A rich progress bar over rounds showing the DP training loss (when released), recall@1 on held-out
users and ε. The console is a public output: it shows releases only, never a round's exact loss."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedemb.monitoring.callback import RoundCallback
from fedemb.monitoring.metric_names import DP_TRAIN_LOSS, EPSILON, RECALL_AT_1


class ProgressReporter(RoundCallback):
    def __init__(self, console: Console | None = None):
        self.progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("DP loss {task.fields[loss]}"), TextColumn("recall@1 {task.fields[recall]}"),
                                 TextColumn("ε {task.fields[eps]}"), TimeElapsedColumn(),
                                 console=console or Console(stderr=True), transient=False)
        self.task = None

    def on_run_start(self, strategy, num_rounds):
        self.progress.start()
        self.task = self.progress.add_task("train", total=num_rounds, completed=strategy.rounds_completed,
                                           loss="-", recall="-", eps="0")

    def on_round_end(self, server_round, arrays, train_metrics, eval_metrics):
        dp_loss = train_metrics.get(DP_TRAIN_LOSS)
        fields = {"loss": "-" if dp_loss is None else f"{dp_loss:.3f}", "eps": f"{train_metrics.get(EPSILON, 0.0):.3g}"}
        if eval_metrics:
            fields["recall"] = f"{eval_metrics[RECALL_AT_1]:.3f}"
        self.progress.update(self.task, completed=server_round, **fields)

    def on_run_end(self, result, strategy):
        self.progress.stop()
