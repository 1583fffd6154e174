"""The ClientApp: trains the virtual clients a train message names and replies their clipped sum.
The same app runs in simulation (every node sees the whole population) and on devices (each node holds
one user's data, named in its node config: fedemb.deploy.device_data). A simulated node fault
(simulation.faults.node_*) answers at once with a marker instead of training."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedemb.deploy.device_data import device_population
from fedemb.protocol import read_train_message, simulated_fault_reply, train_reply
from fedemb.training.client_task import run_train_assignment, simulated_node_fault

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    state, assignment = read_train_message(msg)
    node_fault = simulated_node_fault(assignment)  # simulation.faults.node_*: late or lost, at no real cost
    if node_fault:
        return simulated_fault_reply(msg, node_fault)
    task = assignment.task
    device = device_population(context.node_config, task.image_shape, task.num_classes) if task.devices else None
    update_sum, metrics = run_train_assignment(state, assignment, device=device)
    return train_reply(msg, update_sum, metrics)
