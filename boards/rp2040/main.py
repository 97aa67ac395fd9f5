"""edgenode on a Raspberry Pi Pico (RP2040): publish the temperature, switch the LED.

Wiring (3.3 V logic on both sides, crossed over; UART0 of the Pico):

    Pico GP0 (UART0 TX, pin 1) ------> Raspberry Pi GPIO15 / RXD (header pin 10)
    Pico GP1 (UART0 RX, pin 2) <------ Raspberry Pi GPIO14 / TXD (header pin 8)
    Pico GND (pin 3) ------------------ Raspberry Pi GND (header pin 6)

On the Pi: ``edgenode run --serial /dev/serial0:115200``. On the Pico:
install firmware_bridge (see boards/README.md) and copy this file as main.py.
The device shows up as ``<pi's ip>/pico-XXXXXX``; it publishes "rp2040/temp"
(degrees Celsius as text, from the on-chip sensor on ADC 4) every 5 s and
answers requests on "rp2040/led" with payload "on", "off" or "toggle" (empty:
toggle), replying the new state.
"""

import asyncio
import binascii
import gc

import machine

from firmware_bridge.driver import Device
from firmware_bridge.link import LinkError

DEVICE_ID = "pico-" + binascii.hexlify(machine.unique_id()).decode()[-6:]
PUBLISH_EVERY_MS = 5000
#: The hardware watchdog resets the board when the event loop stops turning
#: for this long: a hang inside the firmware or a scheduler step that no
#: Python code can catch (docs/microcontrollers.md, "Recommended
#: supervision"). Under the RP2040's 8.3 s maximum. Once started it cannot
#: be stopped: while developing with mpremote, comment out its two lines in
#: main(), or the board resets a few seconds after the program ends.
WATCHDOG_MS = 8000

led = machine.Pin("LED", machine.Pin.OUT)  # Pico and Pico W
sensor = machine.ADC(4)


def temperature_c() -> float:
    """The RP2040's temperature sensor, per its datasheet (27 C at 0.706 V)."""
    volts = sensor.read_u16() * 3.3 / 65535
    return 27 - (volts - 0.706) / 0.001721


async def on_led(payload: bytes) -> bytes:
    if payload == b"on":
        led.value(1)
    elif payload == b"off":
        led.value(0)
    elif payload in (b"", b"toggle"):
        led.toggle()
    else:
        raise ValueError("expected on, off or toggle, got " + repr(payload))
    return b"on" if led.value() else b"off"


async def publish_forever(device: Device) -> None:
    while True:
        await device.wait_up()
        try:
            await device.publish("rp2040/temp", f"{temperature_c():.1f}".encode())
        except LinkError as exc:  # the host went away meanwhile: wait for it again
            print("publish failed:", exc)
        except MemoryError:  # nothing was sent: the next turn tries again
            gc.collect()
        await asyncio.sleep_ms(PUBLISH_EVERY_MS)


async def feed_watchdog(watchdog: "machine.WDT") -> None:
    # Fed by a task of its own: it runs only while the scheduler turns.
    while True:
        watchdog.feed()
        await asyncio.sleep_ms(WATCHDOG_MS // 4)


async def main() -> None:
    # The recommended supervision: run() ends only when the UART fails
    # (a MemoryError it survives by itself, counting it in device.stats and
    # telling the node). Should it end, start a new Device (a new session)
    # after a pause, rather than leave the board silent. What Python cannot
    # see (a hang below it) the hardware watchdog resets.
    watchdog = machine.WDT(timeout=WATCHDOG_MS)
    asyncio.create_task(feed_watchdog(watchdog))
    uart = machine.UART(0, 115200, tx=machine.Pin(0), rx=machine.Pin(1), rxbuf=512)
    while True:
        device = Device(asyncio.StreamReader(uart), asyncio.StreamWriter(uart, {}), DEVICE_ID)
        device.handle("rp2040/led", on_led)
        app = asyncio.create_task(publish_forever(device))
        try:
            await device.run()
        except Exception as exc:  # not expected: the driver handles its own errors
            print("device stopped:", exc)
        app.cancel()
        print("device stopped:", device.stats["last_error"], "- restarting")
        gc.collect()
        await asyncio.sleep_ms(1000)


def run_forever() -> None:
    """Turn the event loop for ever. An exception that escapes asyncio's own
    code (its scheduler meeting a full heap: printing a task's error, for
    one) would end ``asyncio.run`` and leave the board silent with the
    watchdog fed by nobody: count it and turn the loop on, every task with
    it."""
    loop = asyncio.get_event_loop()
    loop.create_task(main())
    while True:
        try:
            loop.run_forever()
        except Exception:  # allocate nothing here: the heap may still be full
            gc.collect()


run_forever()
