"""edgenode on an ESP32: publish the chip's temperature, switch the LED on request.

Wiring (3.3 V logic on both sides, crossed over; UART2 of the ESP32):

    ESP32 GPIO17 (UART2 TX) ------> Raspberry Pi GPIO15 / RXD (header pin 10)
    ESP32 GPIO16 (UART2 RX) <------ Raspberry Pi GPIO14 / TXD (header pin 8)
    ESP32 GND ---------------------- Raspberry Pi GND (header pin 6)

On the Pi: ``edgenode run --serial /dev/serial0:115200``. On the ESP32:
install firmware_bridge (see boards/README.md) and copy this file as main.py.
The device shows up as ``<pi's ip>/esp32-XXXXXX``; it publishes "esp32/temp"
(degrees Celsius as text) every 5 s and answers requests on "esp32/led"
with payload "on", "off" or "toggle" (empty: toggle), replying the new state.
"""

import asyncio
import binascii
import gc

import machine

from firmware_bridge.driver import Device
from firmware_bridge.link import LinkError

DEVICE_ID = "esp32-" + binascii.hexlify(machine.unique_id()).decode()[-6:]
LED_PIN = 2  # the on-board LED of most ESP32 DevKit boards
PUBLISH_EVERY_MS = 5000
#: The hardware watchdog resets the board when the event loop stops turning
#: for this long: a hang inside the firmware or a scheduler step that no
#: Python code can catch (docs/microcontrollers.md, "Recommended
#: supervision"). Under the RP2040's 8.3 s maximum. Once started it cannot
#: be stopped: while developing with mpremote, comment out its two lines in
#: main(), or the board resets a few seconds after the program ends.
WATCHDOG_MS = 8000

led = machine.Pin(LED_PIN, machine.Pin.OUT)


def temperature_c(count: int) -> int:
    """The chip's temperature in degrees C, or a fake value on a chip without a sensor."""
    try:
        import esp32

        if hasattr(esp32, "mcu_temperature"):  # ESP32-S2, -S3, -C3: Celsius
            return esp32.mcu_temperature()
        return (esp32.raw_temperature() - 32) * 5 // 9  # the original ESP32: Fahrenheit
    except (ImportError, AttributeError, OSError):
        return 20 + count % 5


async def on_led(payload: bytes) -> bytes:
    if payload == b"on":
        led.value(1)
    elif payload == b"off":
        led.value(0)
    elif payload in (b"", b"toggle"):
        led.value(not led.value())
    else:
        raise ValueError("expected on, off or toggle, got " + repr(payload))
    return b"on" if led.value() else b"off"


async def publish_forever(device: Device) -> None:
    count = 0
    while True:
        await device.wait_up()
        try:
            await device.publish("esp32/temp", str(temperature_c(count)).encode())
        except LinkError as exc:  # the host went away meanwhile: wait for it again
            print("publish failed:", exc)
        except MemoryError:  # nothing was sent: the next turn tries again
            gc.collect()
        count += 1
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
    uart = machine.UART(2, 115200, tx=17, rx=16, rxbuf=512)
    while True:
        device = Device(asyncio.StreamReader(uart), asyncio.StreamWriter(uart, {}), DEVICE_ID)
        device.handle("esp32/led", on_led)
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
